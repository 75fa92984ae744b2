"""The static type of an experiment config.

A config is an ``ml_collections.ConfigDict``. Its stubs type every attribute as the
union of all the types a field may hold, so a static checker cannot follow
``config.train.steps``. The schema (:mod:`jaxprune.train.schema`) checks every field's
real type at run time, before any work (``validate_config``); code that reads fields
takes the config as :data:`Config`.
"""

from typing import Any

Config = Any
