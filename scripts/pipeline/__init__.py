"""Code shared by the numbered pipeline stages (see docs/contract.md).

Submodules:
    contract  -- token contract: special tokens, bandwidths, the `.th` token-file format
    cli       -- argparse pieces, artist-name checks, logging, exit codes, stage reports
    files     -- atomic writes and paths that must stay inside the project root
    codec     -- the one adapter around transformers' 48 kHz Encodec (stages 2 and 5)
    audio     -- decoding, stereo mixing, resampling and loudness (stages 1 and 5)
    manifest  -- reading and validating `metadata_clean_<artist>.jsonl` (stages 4 and 5)
    dist      -- torchrun / torch.distributed helpers (stages 2 and 4)
    stages    -- import a numbered script (e.g. the model in 4_Transformer.py) as a module
"""
