"""``umarvel demo``: the whole U-MARVEL recipe on a generated benchmark, on a laptop CPU, in minutes.

- :mod:`umarvel.demo.benchmark`: the generated data (stage-1 paraphrase pairs, stage-2 image-caption pairs, a
  seven-task M-BEIR tree of drawn objects) and the chance level of every task.
- :mod:`umarvel.demo.plan`: the two presets (``quick``, ``default``): data sizes, tiny model, steps per stage.
- :mod:`umarvel.demo.pipeline`: stages 1-5 with mining, the reranker, the teacher lists and distillation,
  M-BEIR local / global evaluation after every stage and U-MARVEL+ at the end, all through the library
  functions the real commands call (``run_stage``, ``mine``, ``train_reranker``, ``build_teacher_file``,
  ``evaluate_mbeir``, ``evaluate_plus``).
- :mod:`umarvel.demo.progress`: one progress bar over the whole run (stage, step, loss, elapsed, remaining).
- :mod:`umarvel.demo.report`: the recall tables, ``results.md``, ``results.json`` and ``recall_per_stage.png``.
"""
