"""`python -m study bench`: this project's training loop against the Hugging Face `Trainer`.

Both loops train a fresh copy of the same model (`build_model`) on the same tokenised training
split with the same settings and, in each repeat, the same seed (the next repeat takes the next
seed, so the spread of validation F1 over repeats shows each loop's seed noise, against which the
loops' F1 difference is judged). They run in one process, alternating (ours first in odd
repeats, the reference first in even ones, so a drift in machine load hits both alike), after a
warm-up run of each that is not counted. Each run is timed as a user waits for it: its setup
(the copy to the device, CUDA graph capture and the optimizer for ours; building the Trainer up
to its first epoch for the reference) plus its training epochs (the device synced at both ends;
evaluation excluded), and then scored on the validation split by the same evaluation code. The
report gives medians over the repeats; its last line is one JSON object for scripts (`ours_s`,
`reference_s`: seconds per epoch, setup included; `speedup` = reference_s / ours_s; the epochs
alone in `*_epoch_s` and `speedup_epochs_only`; ...).

Both loops train on one GPU: with several visible GPUs the Trainer would split every batch over
all of them (`DataParallel`), so `bench` refuses and says how to pick one.

`bench --workers 1 2 4` measures something else: trials per hour of `optimize --workers N`, the
LoRA trials of a fresh study (random sampler, no pruning, so every trial does the same work)
timed from start-up to the last trial, all workers on one device, and each trial's peak memory
(`peak_mem_mb`), which must not grow from trial to trial.

One module per concern: `command` (the command line, importable without torch), `config` (the
settings and their checks), `loops` (the loop comparison), `reference` (the Trainer loop it is
compared with), `memory` (peak memory over a block), `hardware` (the machine's description) and
`workers` (the `--workers` measurement).
"""
