"""Simulated raters: tooling that drives a running ppo-feedback page through its public API.

Not part of the app: nothing in app.py or ppo_feedback/ imports it, and the Docker image leaves it out.

    raters.py   tastes over response texts (`--preference`) and the scripted raters that score with them
    lexicon.py  the opinion-word lexicon of the `sentiment` taste
    room.py     the room: K raters against the page through `gradio_client`, and what they saw
    report.py   per-version summaries, CSV, plot, latencies and the exactly-once check
    __main__.py the command line: python -m simulator --url http://127.0.0.1:7860/ ...
"""
