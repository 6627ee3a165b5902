/* ppo-feedback keyboard: 1-5 rates the focused (or last clicked) candidate and moves to the next one,
   b marks it as the best, Enter submits (Ctrl+Enter also from inside a text box). */
(() => {
  const editable = (el) => !!el && (el.isContentEditable ||
      ((el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && !["radio", "checkbox", "button", "submit"].includes(el.type)))
       && !el.readOnly && !el.disabled));
  const visible = (el) => !!el && el.offsetParent !== null;
  const candidates = () => Array.from(document.querySelectorAll(".candidate")).filter(visible);
  let current = null;
  const mark = (card) => {
    document.querySelectorAll(".candidate.kbd-current").forEach((c) => c.classList.remove("kbd-current"));
    current = card;
    if (card) card.classList.add("kbd-current");
  };
  const pick = (container, text) => {
    if (!container) return false;
    for (const label of container.querySelectorAll("label")) {
      const input = label.querySelector("input[type=radio]");
      if (input && label.textContent.trim() === text) { input.click(); return true; }
    }
    return false;
  };
  const focusCard = (card) => {
    if (!card) return;
    card.focus();
    mark(card);
  };
  /* Read-only text boxes are disabled textareas, which cannot take focus: the cards themselves can. */
  const focusable = () => document.querySelectorAll(".candidate:not([tabindex])").forEach((c) => { c.tabIndex = 0; });
  new MutationObserver(focusable).observe(document.documentElement, {childList: true, subtree: true});
  window.ppoFeedbackFocusCandidate = (index) => focusCard(document.querySelector("#candidate-" + index));
  const submit = () => {
    const button = document.querySelector("#submit-ratings");
    if (visible(button) && !button.disabled) { button.click(); return true; }
    return false;
  };
  const track = (event) => {
    const card = event.target.closest && event.target.closest(".candidate");
    if (card) mark(card);
  };
  document.addEventListener("focusin", track, true);
  document.addEventListener("pointerdown", track, true);
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      if (submit()) event.preventDefault();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || editable(target)) return;
    const card = (target.closest && target.closest(".candidate")) || (visible(current) ? current : null);
    if (/^[1-5]$/.test(event.key)) {
      if (!card) return;
      if (pick(card.querySelector(".rating"), event.key)) {
        event.preventDefault();
        const list = candidates();
        const next = list[list.indexOf(card) + 1];
        if (next) focusCard(next); else mark(card);
      }
    } else if (event.key === "b" || event.key === "B") {
      if (!card) return;
      const index = /^candidate-(\d+)$/.exec(card.id);
      const letter = index ? "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[Number(index[1])] : null;
      if (letter && pick(document.querySelector("#best-candidate"), letter)) event.preventDefault();
    } else if (event.key === "Enter") {
      if (target.tagName === "BUTTON" || target.tagName === "A") return;
      if (card || candidates().length) { if (submit()) event.preventDefault(); }
    }
  }, true);
})();
