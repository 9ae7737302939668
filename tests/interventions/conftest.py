import warnings

warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*did not run.*")
