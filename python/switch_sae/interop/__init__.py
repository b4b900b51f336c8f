"""Taking our SAEs into other tools: SAELens files, SAEBench's custom-SAE interface, and
splicing an SAE into a TransformerLens model (like SAELens's ``HookedSAETransformer``)."""

from .saebench import SAEBenchConfig, SAEBenchWrapper
from .saelens import export_to_saelens, import_from_saelens, is_exact_export
from .splice import run_with_sae, splice_sae, spliced_activation

__all__ = [
    "SAEBenchConfig",
    "SAEBenchWrapper",
    "export_to_saelens",
    "import_from_saelens",
    "is_exact_export",
    "run_with_sae",
    "splice_sae",
    "spliced_activation",
]
