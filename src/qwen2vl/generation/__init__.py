"""Generation: sampling, stopping, the prefill + decode loop (generate / stream_generate) and streamers.

Imports config, errors and model; works on ids and tensors, never on conversations or processors.
"""
