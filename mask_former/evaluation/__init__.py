from .backends import EVAL_BACKENDS, check_eval_backend
from .build import TASK_EVALUATORS, build_evaluator, model_output_tasks
from .instance_evaluation import InstanceSegEvaluator
from .panoptic_evaluation import HotcocoPanopticEvaluator
from .sem_seg_evaluation import CheckedSemSegEvaluator
