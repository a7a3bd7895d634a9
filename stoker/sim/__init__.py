"""Discrete-event fleet simulator driving the real placement, planning and eviction code."""
