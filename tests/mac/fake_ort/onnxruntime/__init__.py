"""
A stand-in for onnxruntime that offers the providers named in
FAKE_ORT_PROVIDERS (default: what the wheel offers on an Apple Silicon Mac).
"""

import os

__version__ = "0.0-fake"


def get_available_providers():
    listed = os.environ.get("FAKE_ORT_PROVIDERS", "CoreMLExecutionProvider,AzureExecutionProvider,CPUExecutionProvider")
    return [p for p in listed.split(",") if p]
