"""Evaluating a model's routing, offline or live: everything between the metrics and the commands.

- :mod:`rmoe.evaluation.routing_eval`: run a model over batches and gather its loss and every routing
  metric (:func:`~rmoe.evaluation.routing_eval.evaluate_routing`), the exact per-layer histograms, and
  the multi-process reduction of :class:`~rmoe.metrics.RoutingStats`;
- :mod:`rmoe.evaluation.expert_analyses`: what the experts do (OLMoE, "A Closer Look into MoE");
- :mod:`rmoe.evaluation.splits`: a checkpoint's data split, rebuilt from its run's config.

Used by ``rmoe analyze`` (:mod:`rmoe.analyze`), ``rmoe inspect`` and the training callback
(:mod:`rmoe.training.analytics`); it imports nothing from training or the commands.
"""
