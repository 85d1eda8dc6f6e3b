"""The one exception a user sees when a data set cannot be loaded as asked.

It subclasses ValueError so callers that validate configs (study/config.py) can treat a bad data set
like any other bad value, and its message always says what was expected instead.
"""


class DataError(ValueError):
    """Unknown data set or kwarg, missing files, or files in a layout the loader does not read."""
