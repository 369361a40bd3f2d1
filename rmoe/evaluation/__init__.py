"""Evaluating a model's routing, offline or live: everything between the metrics and the commands.

- :mod:`rmoe.evaluation.routing_eval`: a model's loss and every routing metric over batches, per-layer
  histograms, and the multi-process reduction of :class:`~rmoe.metrics.RoutingStats`;
- :mod:`rmoe.evaluation.expert_analyses`: what the experts do (OLMoE, "A Closer Look into MoE");
- :mod:`rmoe.evaluation.splits`: a checkpoint's data split, rebuilt from its run's config.

It imports nothing from training or the commands.
"""
