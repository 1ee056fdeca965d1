"""Shapes: a toy text-to-image benchmark that trains and scores on a CPU.

  shapes.py     the procedural captioned dataset: renderer (`render`, `random_caption`)
                and its exact oracle (`parse`, `detect`, `score`)
  data.py       registers the dataset 'shapes' and the caption rewrite 'shapes_canonical'
                (configs list it in `input.modules`)
  alignment.py  oracle verdicts -> rates per category; held-out captions
  configs/      the `shapes` size of each family (`get_config('stage=base64')`, ...)
  demo.py       `python -m projects.shapes.demo --workdir=DIR`: train, sample, score
  claims.py     `python -m projects.shapes.claims`: the papers' claims at toy scale
  evaluate.py   `python -m projects.shapes.evaluate`: Shapes alignment of a cascade
  docs/         the demo's results and history, the claims' report
"""
