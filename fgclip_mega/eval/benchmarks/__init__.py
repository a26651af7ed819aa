"""Public benchmarks in their own file formats with FG-CLIP's protocol: FG-OVD (fgovd.py),
long- and short-caption retrieval (retrieval.py), zero-shot (zeroshot.py) and box
classification (boxcls.py); the protocol settings (protocol.py), DP-distributed encoding
(engine.py, common.py), the command line (cli.py) and the paper's numbers (golden.py)."""
