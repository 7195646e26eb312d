"""Settings shared by every test folder: the hypothesis profiles of the fuzz tests.

``ci`` (the default) runs a small, fixed set of examples: derandomized so a
run is reproducible, no per-example deadline so a busy machine cannot make a
property flaky, and no example database written to the work tree. ``fuzz``
(``HYPOTHESIS_PROFILE=fuzz``, what ``make fuzz`` sets) runs many random
examples: 20,000 per property, or ``FUZZ_EXAMPLES``. Tests marked ``fuzz``
use whichever profile is loaded.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=75, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_IS_FINE, print_blob=True)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")), deadline=None,
                          database=None, suppress_health_check=_SLOW_IS_FINE, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
