"""The space file, the lowest layer of `search`: what a user writes (`spec`: the pipeline of
stages, its metric and fixed fields; `params`: one searchable parameter) and what follows from it
alone (`grid`: a finite space's configurations). No database, no Optuna study, no worker."""
