() => {
  // The page's own behaviour, on top of Gradio's components (launch(js=...) runs this once the page is built).

  // 1. Pasting an image anywhere on the page (outside text fields) adds it to the subject photos: the clipboard
  //    files are handed to the subject upload's file input, so they pass the same server checks.
  document.addEventListener("paste", (event) => {
    const target = event.target;
    if (target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT")) return;
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []).filter(
      (file) => file.type.startsWith("image/")
    );
    const input = document.querySelector("#subject-upload input[type=file]");
    if (!files.length || !input) return;
    event.preventDefault();
    const transfer = new DataTransfer();
    const stamp = Date.now();
    files.forEach((file, i) => {
      const extension = (file.type.split("/")[1] || "png").replace("jpeg", "jpg");
      transfer.items.add(new File([file], `pasted-${stamp}-${i}.${extension}`, { type: file.type }));
    });
    input.files = transfer.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });

  // 2. The γ slider is one control. Gradio's slider renders ("release") on a mouse or touch release and when its
  //    number box loses focus; here arrow keys (after a short pause) and Enter in the number box do too. The
  //    release is the slider's own: a pointerup on the element Gradio listens to.
  const SLIDERS = "#gate-slider, #strength-slider";
  const PAUSE_MS = 350; // arrow keys held or pressed in a row render once, after this pause
  const KEYS = new Set(["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"]);
  let pending = null;
  const release = (input) => input.dispatchEvent(new PointerEvent("pointerup", { bubbles: true }));

  // 3. The number box of a slider passes on only values the slider accepts: an empty box, a half-typed number
  //    or one out of range never reaches the server (Gradio would answer it with an error); leaving the box or
  //    pressing Enter puts a value it can take back (the nearest in range, or the slider's own).
  const inBox = (target) => target instanceof HTMLInputElement && target.type === "number" && target.closest(SLIDERS);
  const accepted = (box) => {
    const value = box.value.trim() === "" ? NaN : Number(box.value);
    return Number.isFinite(value) && value >= Number(box.min) && value <= Number(box.max);
  };
  const settle = (box) => {
    if (accepted(box)) return;
    const value = box.value.trim() === "" ? NaN : Number(box.value);
    const range = box.closest(SLIDERS).querySelector("input[type=range]");
    box.value = Number.isFinite(value) ? String(Math.min(Math.max(value, Number(box.min)), Number(box.max)))
                                       : range.value;
    box.dispatchEvent(new Event("input", { bubbles: true }));
  };
  window.addEventListener("input", (event) => {
    if (inBox(event.target) && !accepted(event.target)) event.stopImmediatePropagation();
  }, true);
  window.addEventListener("blur", (event) => { if (inBox(event.target)) settle(event.target); }, true);

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (inBox(target) && event.key === "Enter") {
      event.preventDefault();
      settle(target);
      release(target);
    }
  });
  document.addEventListener("keyup", (event) => {
    const target = event.target;
    if (!(target instanceof HTMLInputElement) || !target.closest("#gate-slider") || !KEYS.has(event.key)) return;
    clearTimeout(pending);
    pending = setTimeout(() => release(target), PAUSE_MS);
  });

  // 4. A photo dropped, pasted or chosen is checked by the server before it joins the subject. A render clicked
  //    meanwhile (Generate, Run sweep, Run grid) waits for that answer, the server's count of answered uploads
  //    (#uploads-done) moving on, instead of rendering without the photo; after UPLOAD_WAIT_MS it goes anyway.
  const UPLOAD_WAIT_MS = 20000;
  const answered = () => {
    const box = document.querySelector("#uploads-done textarea, #uploads-done input");
    return box ? box.value : null;
  };
  let upload = null; // {count: answered() when it started, since: ms}
  const inUpload = (target) => target instanceof Element && target.closest("#subject-upload");
  const started = (event) => {
    if (inUpload(event.target) && upload === null) upload = { count: answered(), since: Date.now() };
  };
  document.addEventListener("change", started, true);
  document.addEventListener("drop", started, true);
  const uploading = () => {
    if (upload !== null && (answered() !== upload.count || Date.now() - upload.since > UPLOAD_WAIT_MS)) upload = null;
    return upload !== null;
  };
  document.addEventListener("click", (event) => {
    const button = event.target instanceof Element && event.target.closest("#generate, #run-sweep, #run-grid");
    if (!button || !uploading()) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    const retry = () => (uploading() ? setTimeout(retry, 100) : button.click());
    setTimeout(retry, 100);
  }, true);

  // 5. While the γ slider is dragged (a pointer held on it), each move asks the server for a render there
  //    (#drag-render): where renders are fast it makes one, the newest position only; elsewhere it answers nothing.
  let dragging = false;
  document.addEventListener("pointerdown", (event) => {
    dragging = event.target instanceof Element && event.target.closest("#gate-slider input[type=range]") !== null;
  }, true);
  document.addEventListener("pointerup", () => { dragging = false; }, true);
  document.addEventListener("input", (event) => {
    if (!dragging || !(event.target instanceof Element) || !event.target.closest("#gate-slider")) return;
    const button = document.querySelector("#drag-render");
    if (button) setTimeout(() => button.click(), 0); // after Gradio has taken the slider's new value
  });
}
