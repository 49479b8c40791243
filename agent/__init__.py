"""ambit-agent: the node agent (enrolment, datapath, HBONE proxy, policy, telemetry)."""
__version__ = "0.1.0"
