"""Names of the attributes the service writes on Optuna's trials, beside Optuna's own: plain
strings, in a module of their own so every layer can name them without importing policy."""

ROOT = "root"  # user attr: number of the first attempt of this configuration
CRASHES = "crashes"  # user attr: how many attempts of it died without a word
RETRY_OF = "retry_of"  # user attr: the number of the attempt this one retries
CLAIM = "hpo:claim"  # system attr: the token of the ask that took the trial
# system attr: the configuration (`grid.key`) a trial of a finite space holds
CONFIGURATION = "hpo:configuration"
# user attr of a confirmation trial: {"key", "rank", "stage", "trial", "value", "seed", "values"}:
# which configuration it re-runs (`values`, carried in place of the stage's) and with which seed
CANDIDATE = "candidate"
# user attr of a trial queued from a stage's `start` list (search/space/spec.py): its index there
START = "start"
# study user attr of the last stage: the winner's test metrics, computed once (`results.best`)
WINNER_TEST = "winner_test"
# user attr of a trial that early stopping ended (TrainConfig.early_stop_patience): the epoch
# after which it stopped, short of the stage's epochs; absent for a trial that trained them all
EARLY_STOPPED = "early_stopped"
# user attr of a complete trial: {"mean", "max"} of its steps' gradient norms (before clipping)
# over every epoch it trained; the per-epoch figures are in its "epochs" attribute
GRAD_NORM = "grad_norm"
