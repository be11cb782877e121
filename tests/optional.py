"""Optional packages in tests: a skip with the install command on a user's machine, a failure in CI.

CI (CI=true) installs every extra that .ci/run names, so a missing package there is a broken install step,
not a reason to skip.
"""

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(module, extra):
    """The imported `module`, or a skip naming `pip install 'npgpt[extra]'` (a failure when CI=true)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not installed ({exc}): pip install 'npgpt[{extra}]'"
        if IN_CI:
            pytest.fail(f"CI installs npgpt[{extra}], yet {message}")
        pytest.skip(message, allow_module_level=True)
