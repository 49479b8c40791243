"""Command-line front ends: ambitctl (debug) and ambit (lab, tools)."""
