"""Shared pytest setup: Hypothesis profiles.

"ci" is derandomized (the same examples on every run, so a red build is
reproducible) and keeps no example database. It is picked with
`pytest --hypothesis-profile=ci`, HYPOTHESIS_PROFILE=ci, or automatically
when CI is set. Tests still bound their own max_examples: every new array
shape is a fresh XLA compile.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
