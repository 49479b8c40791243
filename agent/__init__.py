"""ambit-agent: the node agent (enrolment, datapath, HBONE proxy, policy, telemetry)."""
from . import pyroute2_lazy

__version__ = "0.1.0"

pyroute2_lazy.install()  # before any module of the agent imports pyroute2
