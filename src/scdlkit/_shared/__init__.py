"""The ground floor: helpers every layer may import. It imports no layer of scdlkit.

``hardware`` (devices, native bf16), ``progress`` (tqdm), ``validation`` (expression matrices and
gene names), ``labels`` (label and batch columns), ``provenance`` (versions, writable AnnData),
``slots`` (writing results into AnnData slots), ``persist`` (hash-checked, atomic folder saves),
``strategies`` (the strategy names, torch-free).
"""
