"""The page's layout: the Gradio components of the status panel and of each tab, grouped by tab.

`lay_out(app)` must run inside `gr.Blocks`; it returns a `Page` whose parts the handlers
(`handlers.py`) and the API (`api.py`) wire up. Nothing here reacts to events.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from db.export import FORMATS
from .cards import FLAG_CHOICES, LETTERS
from .controller import FeedbackApp
from .inputs import md_escape

SCORES = [1, 2, 3, 4, 5]
STATUS_REFRESH_S = 2.0
VERSION_COLUMNS = ["version", "status", "parent", "mean rating", "ratings"]
KEYBOARD_HELP = ("Keyboard: click or Tab to a candidate, then 1–5 rates it and moves to the next one; "
                 "b marks it as the best, t ties it with the best, f flags it; n: none is good; Enter submits "
                 "(Ctrl+Enter from inside a text box); u undoes your last submission; s skips the prompt.")
AGREEMENT_COLUMNS = ["raters", "alpha (ratings)", "rated by both", "pick agreement", "pages judged by both"]


@dataclass
class StatusPanel:
    """Who is signed in, the live status boxes, the notice banner and the state the refresh compares."""

    who: gr.Markdown
    serving: gr.Textbox
    newest: gr.Textbox
    worker: gr.Textbox
    ratings: gr.Textbox
    banner: gr.Textbox
    seen_version: gr.State
    fingerprint_seen: gr.State

    @property
    def boxes(self) -> list[gr.Textbox]:
        """Return the four status boxes, in the order `handlers.status_outputs` fills them."""
        return [self.serving, self.newest, self.worker, self.ratings]


@dataclass
class RateTab:
    """The guidelines, my progress, the prompt, the candidate cards (text, rating, flag and reason each),
    the best pick (two or more: a tie), none is good, the comment, submit, undo, skip and my history."""

    guidelines: gr.Textbox
    progress: gr.Textbox
    prompt: gr.Textbox
    next_button: gr.Button
    skip_button: gr.Button
    n_slider: gr.Slider
    generate_button: gr.Button
    message: gr.Textbox
    shown: gr.State
    offered_page: gr.State
    columns: list[gr.Column]
    texts: list[gr.Textbox]
    radios: list[gr.Radio]
    flags: list[gr.Dropdown]
    reasons: list[gr.Textbox]
    best: gr.CheckboxGroup
    none_good: gr.Checkbox
    comment: gr.Textbox
    submit_button: gr.Button
    undo_button: gr.Button
    history: gr.Dropdown
    change_button: gr.Button

    @property
    def card_outputs(self) -> list:
        """Return the components that show a page: its state, cards, texts, ratings, flags, reasons, best
        pick, none is good and comment (the order `cards.card_updates` fills them in)."""
        return [self.shown, *self.columns, *self.texts, *self.radios, *self.flags, *self.reasons, self.best,
                self.none_good, self.comment]


@dataclass
class ProgressTab:
    """Mean human rating per version, training score and KL per training step, the versions table."""

    rating_plot: gr.LinePlot
    score_plot: gr.LinePlot
    kl_plot: gr.LinePlot
    table: gr.Dataframe
    win_rate: gr.Textbox


@dataclass
class CompareTab:
    """One prompt and seed through the base model, the serving version and a chosen version."""

    prompt: gr.Textbox
    version: gr.Dropdown
    seed: gr.Number
    button: gr.Button
    base: gr.Textbox
    serving: gr.Textbox
    chosen: gr.Textbox


@dataclass
class OperateTab:
    """Admins only: add prompts, roll back, download an adapter, export the ratings."""

    tab: gr.Tab
    table: gr.Dataframe
    upload: gr.File
    pasted: gr.Textbox
    add_button: gr.Button
    add_message: gr.Textbox
    version: gr.Number
    rollback_button: gr.Button
    adapter_button: gr.Button
    message: gr.Textbox
    adapter_file: gr.File
    export_format: gr.Radio
    export_button: gr.Button
    export_file: gr.File
    guidelines: gr.Textbox
    guidelines_button: gr.Button
    guidelines_message: gr.Textbox
    agreement: gr.Dataframe
    agreement_overall: gr.Textbox
    agreement_button: gr.Button
    review: PromptReview


@dataclass
class PromptReview:
    """Operate's list of prompts raters typed, waiting to be admitted to the pool or rejected."""

    table: gr.Dataframe
    prompt_id: gr.Number
    admit_button: gr.Button
    reject_button: gr.Button
    refresh_button: gr.Button
    message: gr.Textbox


@dataclass
class Page:
    """Every component the handlers and the API use, by tab, and the status refresh timer."""

    status: StatusPanel
    rate: RateTab
    progress: ProgressTab
    compare: CompareTab
    operate: OperateTab
    timer: gr.Timer

    @property
    def plots(self) -> list[gr.LinePlot]:
        return [self.progress.rating_plot, self.progress.score_plot, self.progress.kl_plot]

    @property
    def tables(self) -> list[gr.Dataframe]:
        return [self.progress.table, self.operate.table]


def lay_out(app: FeedbackApp) -> Page:
    """Create the page's components inside the current gr.Blocks; return them."""
    gr.Markdown(f"# ppo-feedback\nRate the model's answers; a worker trains it on your ratings and "
                f"the page switches to each new version by itself. Model: {md_escape(app.serving.base_model)}.")
    status = _status_panel(app)
    with gr.Tab("Rate", id="rate"):
        rate = _rate_tab(app)
    with gr.Tab("Progress", id="progress"):
        progress = _progress_tab(app)
    with gr.Tab("Compare", id="compare"):
        compare = _compare_tab()
    with gr.Tab("Operate", id="operate", visible=False) as operate_tab:
        operate = _operate_tab(operate_tab)
    return Page(status, rate, progress, compare, operate, gr.Timer(STATUS_REFRESH_S))


def _status_panel(app: FeedbackApp) -> StatusPanel:
    with gr.Row():
        who = gr.Markdown("", elem_id="who")
        if app.auth_enabled:
            gr.Button("Log out", link="/logout", size="sm", scale=0, min_width=100)
    with gr.Row(elem_id="status-panel"):
        serving = gr.Textbox(label="Serving version", interactive=False, elem_id="status-serving")
        newest = gr.Textbox(label="Newest version", interactive=False, elem_id="status-newest")
        worker = gr.Textbox(label="Worker", interactive=False, elem_id="status-worker", scale=2)
        ratings = gr.Textbox(label="Ratings (total / since the serving version)", interactive=False,
                             elem_id="status-ratings")
    banner = gr.Textbox(label="Notice", interactive=False, visible=False, elem_id="banner")
    return StatusPanel(who, serving, newest, worker, ratings, banner, gr.State(None), gr.State(None))


def _rate_tab(app: FeedbackApp) -> RateTab:
    max_n = app.sampling.max_candidates
    with gr.Accordion("Rating guidelines", open=False, elem_id="guidelines-box"):
        guidelines = gr.Textbox(show_label=False, interactive=False, container=False, lines=2, max_lines=20,
                                elem_id="guidelines", placeholder="No guidelines written yet.")
    progress = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="rater-progress")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=3, max_lines=10, scale=4, elem_id="prompt",
                            placeholder="Press 'Next prompt' or type your own.")
        with gr.Column(scale=1, min_width=180):
            with gr.Row():
                next_button = gr.Button("Next prompt", elem_id="next-prompt", min_width=80)
                skip_button = gr.Button("Skip (s)", elem_id="skip-prompt", min_width=80)
            n_slider = gr.Slider(1, max_n, value=app.sampling.num_candidates, step=1, label="Candidates",
                                 elem_id="n-candidates")
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
    message = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="rate-message",
                         placeholder="")
    columns, texts, radios, flags, reasons = _cards(max_n)
    with gr.Row():
        best = gr.CheckboxGroup(choices=[], label="Best candidate (tick two or more for a tie)",
                                elem_id="best-candidate", scale=3)
        none_good = gr.Checkbox(label="None is good", elem_id="none-good", scale=1)
    comment = gr.Textbox(label="Comment (optional)", lines=2, elem_id="comment")
    with gr.Row():
        submit_button = gr.Button("Submit ratings", variant="primary", elem_id="submit-ratings", scale=3)
        undo_button = gr.Button("Undo my last submission (u)", elem_id="undo", scale=1)
    gr.Markdown(KEYBOARD_HELP, elem_id="kbd-help")
    with gr.Row():
        history = gr.Dropdown(choices=[], label="Change one of my recent ratings", elem_id="history", scale=3)
        change_button = gr.Button("Open it", elem_id="change-rating", scale=1)
    return RateTab(guidelines, progress, prompt, next_button, skip_button, n_slider, generate_button, message,
                   gr.State(None), gr.State(None), columns, texts, radios, flags, reasons, best, none_good, comment,
                   submit_button, undo_button, history, change_button)


def _cards(max_n: int) -> tuple[list, list, list, list, list]:
    """Create the candidate cards (hidden until a page fills them); return their columns, texts, ratings,
    flags and flag reasons."""
    columns, texts, radios, flags, reasons = [], [], [], [], []
    with gr.Row(equal_height=True):
        for i, letter in enumerate(LETTERS[:max_n]):
            with gr.Column(visible=False, min_width=220, elem_classes=["candidate"],
                           elem_id=f"candidate-{i}") as column:
                texts.append(gr.Textbox(label=f"{letter}", lines=6, max_lines=14, interactive=False,
                                        elem_id=f"candidate-text-{i}"))
                radios.append(gr.Radio(SCORES, label=f"Rating of {letter}", elem_classes=["rating"],
                                       elem_id=f"rating-{i}"))
                with gr.Row():
                    flags.append(gr.Dropdown([shown for shown, _ in FLAG_CHOICES], value=None, label="Flag (f)",
                                             elem_classes=["flag"], elem_id=f"flag-{i}", min_width=100))
                    reasons.append(gr.Textbox(label="Reason", lines=1, elem_id=f"flag-reason-{i}", min_width=100))
            columns.append(column)
    return columns, texts, radios, flags, reasons


def _progress_tab(app: FeedbackApp) -> ProgressTab:
    gr.Markdown("Mean human rating of each version's generations is the real measure: did people like "
                "the newer versions more? Version 0 is the base model.")
    rating_plot = gr.LinePlot(x="version", y="mean rating", title="Mean human rating per version",
                              y_lim=[1, 5], tooltip=["version", "mean rating", "ratings"], elem_id="plot-ratings")
    with gr.Row():
        score_plot = gr.LinePlot(x="training step", y="score",
                                 title="Training score per step (PPO: reward-model score; DPO, KTO: implied reward "
                                       "margin)", tooltip=["training step", "version", "iteration", "score"],
                                 elem_id="plot-score")
        kl_plot = gr.LinePlot(x="training step", y="KL", title="KL to the base model per training step",
                              tooltip=["training step", "version", "iteration", "KL"], elem_id="plot-kl")
    table = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, label="Versions", elem_id="progress-versions")
    win_rate = gr.Textbox(label="The raters' verdict on mixed pages (--mix-versions)", interactive=False,
                          visible=app.mix_versions, elem_id="win-rate")
    return ProgressTab(rating_plot, score_plot, kl_plot, table, win_rate)


def _compare_tab() -> CompareTab:
    gr.Markdown("The same prompt and seed through the base model (adapter off), the serving version and "
                "a version you choose. Nothing here is recorded.")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, scale=4, elem_id="compare-prompt")
        with gr.Column(scale=1, min_width=180):
            version = gr.Dropdown(choices=[], label="Version", elem_id="compare-version")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="compare-seed")
            button = gr.Button("Compare", variant="primary", elem_id="compare-button")
    with gr.Row():
        base = gr.Textbox(label="Base model (v0)", lines=6, interactive=False)
        serving = gr.Textbox(label="Serving version", lines=6, interactive=False)
        chosen = gr.Textbox(label="Chosen version", lines=6, interactive=False)
    return CompareTab(prompt, version, seed, button, base, serving, chosen)


def _operate_tab(tab: gr.Tab) -> OperateTab:
    table = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, label="Versions")
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Add prompts**: a text file with one prompt per line, or JSONL with a `prompt` field.")
            upload = gr.File(label="Prompts file", file_types=[".txt", ".jsonl", ".json"], type="filepath",
                             height=120)
            pasted = gr.Textbox(label="…or paste prompts", lines=4, elem_id="operate-paste")
            add_button = gr.Button("Add prompts")
            add_message = gr.Textbox(show_label=False, interactive=False, container=False)
        with gr.Column():
            gr.Markdown("**Versions**: roll back to an earlier one (0 = base model), or download one's "
                        "adapter as a zip (a standard PEFT folder).")
            version = gr.Number(value=0, precision=0, label="Version", elem_id="operate-version")
            with gr.Row():
                rollback_button = gr.Button("Roll back to this version")
                adapter_button = gr.Button("Download adapter zip")
            message = gr.Textbox(show_label=False, interactive=False, container=False)
            adapter_file = gr.File(label="Adapter", interactive=False, height=90)
        with gr.Column():
            gr.Markdown("**Ratings export** (JSONL): `preference` (prompt/chosen/rejected), "
                        "`unpaired` (prompt/completion/label), `ratings` (everything).")
            export_format = gr.Radio(list(FORMATS), value="preference", label="Format")
            export_button = gr.Button("Export ratings")
            export_file = gr.File(label="Export", interactive=False, height=90)
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Rating guidelines** (plain text, shown on the Rate tab; each rating records the "
                        "version in force).")
            guidelines = gr.Textbox(label="Guidelines", lines=6, elem_id="operate-guidelines")
            guidelines_button = gr.Button("Save guidelines", elem_id="save-guidelines")
            guidelines_message = gr.Textbox(show_label=False, interactive=False, container=False,
                                            elem_id="guidelines-message")
        with gr.Column():
            gr.Markdown("**Agreement between raters** on the pages two of them judged (`--overlap`): "
                        "Krippendorff's alpha (ordinal) on ratings, and how often their best picks agree.")
            agreement_overall = gr.Textbox(label="Overall", interactive=False, elem_id="agreement-overall")
            agreement = gr.Dataframe(headers=AGREEMENT_COLUMNS, interactive=False, elem_id="agreement-pairs")
            agreement_button = gr.Button("Refresh agreement", elem_id="refresh-agreement")
    return OperateTab(tab, table, upload, pasted, add_button, add_message, version, rollback_button, adapter_button,
                      message, adapter_file, export_format, export_button, export_file, guidelines, guidelines_button,
                      guidelines_message, agreement, agreement_overall, agreement_button, _prompt_review())


REVIEW_COLUMNS = ["prompt id", "prompt", "typed by", "when"]


def _prompt_review() -> PromptReview:
    """Lay out the review of raters' typed prompts (a row of the Operate tab); return its components."""
    gr.Markdown("**Prompts raters typed**: offered to no other rater and never trained on until admitted.")
    table = gr.Dataframe(headers=REVIEW_COLUMNS, interactive=False, elem_id="review-prompts")
    with gr.Row():
        prompt_id = gr.Number(value=None, precision=0, label="Prompt id", elem_id="review-prompt-id")
        admit_button = gr.Button("Admit to the pool", elem_id="admit-prompt")
        reject_button = gr.Button("Reject", elem_id="reject-prompt")
        refresh_button = gr.Button("Refresh list", elem_id="refresh-review")
    message = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="review-message")
    return PromptReview(table, prompt_id, admit_button, reject_button, refresh_button, message)
