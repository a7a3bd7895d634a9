"""The Stoker agent (import name ``stoker.agent``), one per GPU pod.

Pure modules (``disk_cache``, ``safetensors_header``) do no I/O and read no clock;
downloads, files, CUDA and Kubernetes calls live in the other modules.
"""
