"""`python -m cersa_kernels compare`: fine-tune the real MiniLM-L6 encoder on BBC news with every
method the package ships (plus a linear probe and full fine-tuning) and report accuracy against
measured training memory, side by side. See docs/compare.md.

  data.py     the fixed stratified split of BBC news and its tokenisation
  methods.py  the method table (apply options, learning rates, PARA targets)
  measure.py  peak live tensor bytes, the weights/grads/optimizer/activations breakdown, backends
  worker.py   one (method, seed) run, in a fresh process
  report.py   aggregation over seeds, the Markdown table, the verdict, the plot
  cli.py      the arguments and the orchestration

This module imports nothing heavy: the CLI parser is built without transformers or the data.
"""
