"""The page's named API: one table (`ENDPOINTS`) of the endpoints scripts and `gradio_client` call.

Each row names a method of `Api`, whose signature is the endpoint's arguments and whose docstring is
its description; `register_endpoints` serves every row, with bad input turned into readable errors.
The README's API table lists the same endpoints (a test keeps the two equal).

With a users file the logged-in name is the rater (a `rater` argument is ignored) and only admins
may call the admin endpoints; without one every action is by the local user, who is the admin.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

import gradio as gr

from ..config import SamplingConfig
from .controller import FeedbackApp
from .inputs import shown_errors
from .layout import Page

QUEUES: dict[str, dict[str, Any]] = {
    "free": {"concurrency_limit": None},                         # any number at once
    "model": {"concurrency_id": "model", "concurrency_limit": 1},  # one at a time with every other model call
    "default": {},                                                 # Gradio's default: one at a time per endpoint
}


@dataclass(frozen=True)
class Endpoint:
    """One named endpoint: the `Api` method serving it, whether only admins may call it, its queue (a
    key of QUEUES), the defaults it takes from the app's settings, and (for file downloads) the
    Operate button that serves it."""

    name: str
    admin_action: str | None = None
    """For admin-only endpoints, the action named when someone else calls it ("Only admins can roll back.")."""
    queue: str = "free"
    defaults: Callable[[FeedbackApp], dict[str, Any]] = field(default=lambda app: {})
    button: Callable[[Page], tuple] | None = None
    """For endpoints returning a file: page -> (button, inputs, output), so the page downloads it too."""
    json_route: bool = False
    """Also served as a plain JSON route beside the page (`POST /json/<name>`, see `routes.py`): the cheap
    endpoints, which need no place in Gradio's queue."""


class Api:
    """The endpoints' functions, bound to one FeedbackApp; each returns the JSON (or file path) the API returns."""

    def __init__(self, app: FeedbackApp):
        self.app = app

    def next_prompt(self, rater: str = "", request: gr.Request = None) -> dict:
        """The least-rated pool prompt this rater has not rated: {"prompt_id", "text"} (both null when none is left)."""
        return self.app.next_prompt(self.app.rater(request, rater))

    def generate(self, prompt: str, n: int = SamplingConfig.num_candidates, rater: str = "",
                 request: gr.Request = None) -> list:
        """Generate n candidates with the serving version and record them as one page: [{"generation_id", "prompt_id", "page_id", "text", "version"}]."""
        return self.app.generate(prompt, n, self.app.rater(request, rater))

    def generate_stream(self, prompt: str, n: int = SamplingConfig.num_candidates, rater: str = "",
                        request: gr.Request = None) -> Iterator[list]:
        """As /generate, streamed: [{"text", "version"}] (each candidate's text so far) after every decoded token, then the /generate records."""
        yield from self.app.generate_stream(prompt, n, self.app.rater(request, rater))

    def rate(self, generation_id: int, score: int, comment: str = "", rater: str = "",
             request: gr.Request = None) -> dict:
        """Rate a generation 1..5 with an optional comment: {"ok": true}."""
        return self.app.rate(generation_id, score, comment, self.app.rater(request, rater))

    def prefer(self, chosen_id: int, rejected_ids: list[int], rater: str = "", request: gr.Request = None) -> dict:
        """Record that chosen_id is better than each of rejected_ids (same prompt): {"ok": true}."""
        return self.app.prefer(chosen_id, rejected_ids, self.app.rater(request, rater))

    def submit(self, page_id: int, scores: dict, best: list[int] = [], tie: bool = False, none_good: bool = False,  # noqa: B006
               flags: list[dict] = [], comment: str = "", key: str = "", rater: str = "",  # noqa: B006
               request: gr.Request = None) -> dict:
        """Store one page's judgement as one unit: scores {generation_id: 1..5}, best [id] (or two or more with tie), none_good, flags [{"generation_id", "kind", "reason"}], comment; key makes a retry safe: {"ok", "submission", "message"}."""
        return self.app.submit_page(page_id, scores, best, tie, none_good, flags, comment, key,
                                    self.app.rater(request, rater))

    def undo(self, rater: str = "", request: gr.Request = None) -> dict:
        """Undo my newest submission in force (2 minutes after it, and until a training round starts): {"ok", "undone"}."""
        return self.app.undo(self.app.rater(request, rater))

    def skip(self, prompt_id: int, rater: str = "", request: gr.Request = None) -> dict:
        """Skip a prompt: /next_prompt never offers it to me again: {"ok", "new"}."""
        return self.app.skip(prompt_id, self.app.rater(request, rater))

    def my_submissions(self, limit: int = 20, rater: str = "", request: gr.Request = None) -> list:
        """My newest submissions, newest first (undone ones marked by their status), to change one: [/submit's "submission"]."""
        return self.app.my_submissions(limit, self.app.rater(request, rater))

    def overlap_page(self, rater: str = "", request: gr.Request = None) -> dict:
        """With probability --overlap, a page another rater judged that I have not: {"page_id", "prompt_id", "text", "candidates"} (nulls and [] otherwise)."""
        return self.app.overlap_page(self.app.rater(request, rater))

    def guidelines(self) -> dict:
        """The rating guidelines in force: {"version", "text", "author", "created_at"} (version 0 and "" when none)."""
        return self.app.guidelines()

    def write_guidelines(self, text: str, request: gr.Request = None) -> dict:
        """(admin) Write a new version of the rating guidelines (plain text): as /guidelines."""
        return self.app.write_guidelines(text, self.app.rater(request, ""))

    def agreement(self, rater: str = "") -> dict:
        """(admin) Inter-rater agreement: {"overall", "pairs": [{"raters", "alpha", "shared_generations", "pick_agreement", "shared_pages"}]} (only rater's pairs if given)."""
        return self.app.agreement(rater or "")

    def status(self, request: gr.Request = None) -> dict:
        """Serving and latest version, worker state, counts, and per version {"version", "mean_rating", "n_ratings"} (the worker's holder and a swap error's details for admins only)."""
        record = dict(self.app.status_for(request))
        record.pop("adapter_versions")
        return record

    def export_adapter(self, version: float):
        """(admin) Download a version's adapter as a zip (a PEFT folder)."""
        return self.app.export_adapter(version)

    def export_ratings(self, fmt: str):
        """(admin) Download the ratings as JSONL: preference, unpaired or ratings."""
        return self.app.export_ratings(fmt)

    def pending_prompts(self, limit: int = 100) -> list:
        """(admin) Prompts raters typed that wait for review, oldest first (at most limit): [{"prompt_id", "text", "added_by", "created_at"}]."""
        return self.app.pending_prompts(limit)

    def review_prompt(self, prompt_id: int, admit: bool, request: gr.Request = None) -> dict:
        """(admin) Admit a rater's typed prompt to the pool (admit true) or reject it (false): {"ok", "prompt_id", "admission"}."""
        return self.app.review_prompt(prompt_id, admit, self.app.rater(request, ""))

    def rollback(self, version: int) -> dict:
        """(admin) Serve an earlier version (0 = base model) from now on: {"ok", "rolled_back", "serving_version"}."""
        return self.app.rollback(version)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("next_prompt", json_route=True),
    Endpoint("generate", queue="model", defaults=lambda app: {"n": app.sampling.num_candidates}),
    Endpoint("generate_stream", queue="model", defaults=lambda app: {"n": app.sampling.num_candidates}),
    Endpoint("rate", json_route=True),
    Endpoint("prefer", json_route=True),
    Endpoint("submit", json_route=True),
    Endpoint("undo", json_route=True),
    Endpoint("skip", json_route=True),
    Endpoint("my_submissions", json_route=True),
    Endpoint("overlap_page"),
    Endpoint("guidelines", json_route=True),
    Endpoint("status", json_route=True),
    Endpoint("export_adapter", admin_action="download adapters", queue="default",
             button=lambda page: (page.operate.adapter_button, [page.operate.version], [page.operate.adapter_file])),
    Endpoint("export_ratings", admin_action="export ratings", queue="default",
             button=lambda page: (page.operate.export_button, [page.operate.export_format],
                                  [page.operate.export_file])),
    Endpoint("write_guidelines", admin_action="write guidelines", queue="default"),
    Endpoint("agreement", admin_action="see agreement"),
    Endpoint("pending_prompts", admin_action="review prompts"),
    Endpoint("review_prompt", admin_action="review prompts", queue="default"),
    Endpoint("rollback", admin_action="roll back", queue="default"),
)


def endpoint_function(api: Api, endpoint: Endpoint) -> Callable:
    """Return the function Gradio serves for a row: `endpoint_call`'s, with bad input shown as a readable error."""
    return shown_errors(endpoint_call(api, endpoint))


def endpoint_call(api: Api, endpoint: Endpoint) -> Callable:
    """Return the function serving a row (Gradio's, and the JSON route's): its `Api` method with the row's
    defaults in the signature Gradio reads, and the admin check first (admin endpoints take the request for
    it, and pass it on to a method that declares it: one that needs who acts). Bad input raises ValueError
    or PermissionError; arguments that do not fit the signature raise TypeError."""
    method = getattr(api, endpoint.name)
    defaults = endpoint.defaults(api.app)
    declared = inspect.signature(method).parameters
    if not set(defaults) <= set(declared):
        raise TypeError(f"ENDPOINTS row {endpoint.name!r} does not fit Api.{endpoint.name}: defaults for "
                        f"{sorted(set(defaults) - set(declared))}")
    own_request = "request" in declared
    parameters = [p.replace(default=defaults.get(p.name, p.default)) for p in inspect.signature(method).parameters.values()]
    if endpoint.admin_action and not own_request:
        parameters.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request,
                                            default=None))
    returns = inspect.signature(method).return_annotation
    streams = inspect.isgeneratorfunction(method)
    if streams:  # Gradio reads a streaming endpoint's output type from what each step yields
        returns = get_args(get_type_hints(method)["return"])[0]
    signature = inspect.Signature(parameters, return_annotation=returns)

    def arguments(args, kwargs) -> dict[str, Any]:
        bound = signature.bind(*args, **kwargs)  # bound against the served signature: the row's defaults apply
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        if endpoint.admin_action:
            request = arguments["request"] if own_request else arguments.pop("request")
            api.app.require_admin(request, endpoint.admin_action)
        return arguments

    if streams:
        @functools.wraps(method)
        def call(*args, **kwargs):
            yield from method(**arguments(args, kwargs))
    else:
        @functools.wraps(method)
        def call(*args, **kwargs):
            return method(**arguments(args, kwargs))

    call.__signature__ = signature
    call.__annotations__ = {**method.__annotations__, "return": returns,
                            **({"request": gr.Request} if endpoint.admin_action else {})}
    return call


def register_endpoints(app: FeedbackApp, page: Page) -> None:
    """Serve every row of ENDPOINTS (inside the page's gr.Blocks); returns nothing."""
    api = Api(app)
    for endpoint in ENDPOINTS:
        options = {"api_name": endpoint.name, **QUEUES[endpoint.queue],
                   "api_description": inspect.getdoc(getattr(api, endpoint.name)).splitlines()[0]}
        if endpoint.button is None:
            gr.api(endpoint_function(api, endpoint), **options)
        else:
            button, inputs, outputs = endpoint.button(page)
            button.click(endpoint_function(api, endpoint), inputs, outputs, **options)
