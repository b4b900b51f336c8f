"""Helpers the rest of the package shares, none of them SAE-specific.

``io``: atomic writes, checksums and checked reads of JSON and safetensors files.
``typed_config``: config dataclasses rebuilt from JSON with every field's type checked.
``checks``: argument validation with messages that name the argument.
``tables``: formatting numbers for printed and Markdown tables.
"""
