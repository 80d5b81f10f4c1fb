from .build import build_evaluator
from .instance_evaluation import InstanceSegEvaluator
