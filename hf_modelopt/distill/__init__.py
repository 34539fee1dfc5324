"""Knowledge distillation (teacher -> student). Not implemented yet: its `distill` stage registers here
(DistillationTrainer, losses, students built from teachers, teacher-logit cache)."""
