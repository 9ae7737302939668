"""Head scorers: each returns a :class:`~attnkit.scores.HeadScores` ``[layers, heads]`` usable as a recipe target.

* :func:`~.sink.sink_scores` — attention mass on sink tokens (active vs dormant sink heads);
* :func:`~.image.image_centric_scores` — share of image attention on non-sink image tokens (VAR's head criterion);
* :func:`~.retrieval.retrieval_scores` — copy-paste retrieval score on needle-in-a-haystack inputs;
* :func:`~.divergence.vision_divergence_scores` — ‖head output with image − without image‖ (VHD);
* :func:`~.streaming.streaming_scores` — mass inside sinks + local window (streaming vs retrieval heads).
"""
