"""The diagnostics of the norms, one concern per callback: per-step figures
(``figures.StepFigures``), accuracy with batch statistics and after PreciseBN
(``train_eval``); ``normbench.callbacks.NormDiagnostics`` runs them as one."""
