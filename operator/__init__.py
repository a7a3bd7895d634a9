"""The Stoker operator (import name ``stoker.operator``).

Pure decision modules (``placement``, ``replicas``, ``jobstate``) do no I/O, read no
clock and import no Kubernetes client; the kopf shell gathers state, calls them and
applies their plans.
"""
