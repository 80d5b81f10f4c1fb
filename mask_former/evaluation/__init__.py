from .build import TASK_EVALUATORS, build_evaluator, model_output_tasks
from .instance_evaluation import InstanceSegEvaluator
from .sem_seg_evaluation import CheckedSemSegEvaluator
