"""Knowledge distillation: a frozen teacher's logits as a second target for the student.

``loss.py`` is the math (pure functions); ``config.py`` the ``distill:`` section and its checks;
``teacher.py`` builds the frozen, sharded teacher from an HF directory or one of our checkpoints."""
