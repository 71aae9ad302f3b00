"""Names of the attributes the service writes on Optuna's trials, beside Optuna's own: plain
strings, in a module of their own so every layer can name them without importing policy."""

ROOT = "root"  # user attr: number of the first attempt of this configuration
CRASHES = "crashes"  # user attr: how many attempts of it died without a word
RETRY_OF = "retry_of"  # user attr: the number of the attempt this one retries
CLAIM = "hpo:claim"  # system attr: the token of the ask that took the trial
# system attr: the configuration (`grid.key`) a trial of a finite space holds
CONFIGURATION = "hpo:configuration"
