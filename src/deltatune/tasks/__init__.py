"""Tasks: the head, the preprocessing, the collation and the metrics of one kind of problem."""

from .base import Task, task_for

__all__ = ["Task", "task_for"]
