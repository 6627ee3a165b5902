/* ppo-feedback keyboard: 1-5 rates the focused (or last clicked) candidate and moves to the next one,
   b marks it as the best, t ties it with the best, f opens its flag; n toggles none is good, Enter
   submits (Ctrl+Enter also from inside a text box), u undoes my last submission, s skips the prompt. */
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
  /* The best pick is a checkbox group: b leaves only this card ticked, t ticks it too (a tie). */
  const tick = (letter, only) => {
    const group = document.querySelector("#best-candidate");
    if (!group) return false;
    let found = false;
    for (const label of group.querySelectorAll("label")) {
      const input = label.querySelector("input[type=checkbox]");
      if (!input) continue;
      const mine = label.textContent.trim() === letter;
      found = found || mine;
      if ((mine && !input.checked) || (only && !mine && input.checked)) input.click();
    }
    return found;
  };
  const letterOf = (card) => {
    const index = /^candidate-(\d+)$/.exec(card.id);
    return index ? "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[Number(index[1])] : null;
  };
  const press = (selector) => {
    const button = document.querySelector(selector);
    if (visible(button) && !button.disabled) { button.click(); return true; }
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
  const submit = () => press("#submit-ratings");
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
    } else if (["b", "B", "t", "T"].includes(event.key)) {
      const letter = card && letterOf(card);
      if (letter && tick(letter, event.key.toLowerCase() === "b")) event.preventDefault();
    } else if (event.key === "f" || event.key === "F") {
      const flag = card && card.querySelector(".flag input");
      if (flag) { event.preventDefault(); flag.focus(); flag.click(); }
    } else if (event.key === "n" || event.key === "N") {
      const box = document.querySelector("#none-good input[type=checkbox]");
      if (visible(box) && candidates().length) { event.preventDefault(); box.click(); }
    } else if (event.key === "u" || event.key === "U") {
      if (press("#undo")) event.preventDefault();
    } else if (event.key === "s" || event.key === "S") {
      if (press("#skip-prompt")) event.preventDefault();
    } else if (event.key === "Enter") {
      if (target.tagName === "BUTTON" || target.tagName === "A") return;
      if (card || candidates().length) { if (submit()) event.preventDefault(); }
    }
  }, true);
})();
