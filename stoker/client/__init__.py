"""The user's command line: submit jobs and fetch their images, look at the fleet, cordon agents.

Works like kubectl: the current kubeconfig context and its namespace unless -n says
otherwise, tables by default and -o json for scripts, exit codes scripts can test.
Imports no torch or diffusers, so `pip install stoker` is enough to run it.
"""
