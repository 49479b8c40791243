"""ambit lab: nodes, pods and a tour on one machine, built with the real CNI chain."""
