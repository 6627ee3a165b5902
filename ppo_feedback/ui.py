"""The Gradio page and its named API endpoints (a first page: prompt in, candidates out)."""
from __future__ import annotations

import threading

import gradio as gr

from .config import SamplingConfig
from .generation import PromptError, generate


def build_demo(loaded, sampling: SamplingConfig) -> gr.Blocks:
    """Return the Gradio Blocks app that generates candidates from the loaded model."""
    lock = threading.Lock()  # one model, one generation at a time

    def on_generate(prompt: str, n: float) -> list[dict]:
        n = int(n)
        if len(prompt) > sampling.max_prompt_chars:
            raise gr.Error(f"The prompt is longer than {sampling.max_prompt_chars} characters.")
        if not 1 <= n <= sampling.max_candidates:
            raise gr.Error(f"Ask for 1 to {sampling.max_candidates} candidates.")
        try:
            with lock:
                candidates = generate(loaded.model, loaded.tokenizer, prompt, n, sampling.max_new_tokens,
                                      sampling.temperature, sampling.top_p)
        except PromptError as exc:
            raise gr.Error(str(exc)) from exc
        return [{"text": c.text, "tokens": len(c.token_ids), "finished": c.finished} for c in candidates]

    with gr.Blocks(title="ppo-feedback") as demo:
        gr.Markdown(f"# ppo-feedback\nModel: `{loaded.spec}`. Type a prompt and generate candidates.")
        prompt = gr.Textbox(label="Prompt", lines=2)
        n = gr.Slider(1, sampling.max_candidates, value=sampling.num_candidates, step=1, label="Candidates")
        button = gr.Button("Generate", variant="primary")
        output = gr.JSON(label="Candidates")
        button.click(on_generate, [prompt, n], output, api_name="generate")
    return demo
