"""`python -m study bench`: this project's training loop against the Hugging Face `Trainer`, and
trials per hour of `optimize --workers N`; what each measures is in docs/development.md.

One module per concern: `command` (the command line, importable without torch), `config` (the
settings and their checks), `loops` (the loop comparison), `reference` (the Trainer loop it is
compared with), `memory` (peak memory over a block), `hardware` (the machine's description) and
`workers` (the `--workers` measurement).
"""
