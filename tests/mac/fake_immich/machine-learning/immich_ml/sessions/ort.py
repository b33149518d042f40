# Imports as Immich's immich_ml/sessions/ort.py does: the list by name.
import onnxruntime as ort

from immich_ml.models.constants import SUPPORTED_PROVIDERS


def default_providers():
    """
    Immich's OrtSession._providers_default, without OpenVINO's device check.
    """
    available_providers = set(ort.get_available_providers())
    return [provider for provider in SUPPORTED_PROVIDERS if provider in available_providers]
