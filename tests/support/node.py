"""Temporary alias while tests move to ambit.agent.lab.node."""
from ambit.agent.lab.node import *  # noqa: F401,F403
from ambit.agent.lab.node import REPO, NETNS_DIR  # noqa: F401
