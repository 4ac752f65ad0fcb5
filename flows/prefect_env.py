"""Prefect settings that must be in place before `import prefect`.

Measured here (DESIGN.md section 6): with no PREFECT_API_URL a flow starts a
temporary local server, which takes 8-19 s on a 2-core machine, more than Prefect's
default start-up timeout; and analytics would try to reach the network. Values
already set in the environment win.
"""
import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)
