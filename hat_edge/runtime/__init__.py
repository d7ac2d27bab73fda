"""hat_edge.runtime: the device contract, and what runs on the device. Standard library + numpy.

The bottom of the house: it imports nothing of hat_edge above it, and everything else imports its
formats from here. One module per concern:

  formats   names, versions and closed sets of every wire format (bundle, job, result)
  errors    UserError and RunnerError (one-line messages)
  bundle    the bundle manifest: reading and checking it (`read_manifest`), generated weights
  job       `MeasureSpec` (the one shape of measurement settings), job files, result lines
  decoding  greedy and beam search over a step function
  backends  a bundle's graphs on onnxruntime or TorchScript (`open_model`, `translate`)
  timing    warm-up, repeats and statistics (`measure`, `measure_interleaved`)
  envinfo   what machine this is (`collect_env`)
  runner    the command line: `python runner.pyz env|run|check|translate`
  pack      the runner shipped as one zipapp file named by its hash
"""
