() => {
  // Pasting an image anywhere on the page (outside text fields) adds it to the subject photos:
  // the clipboard files are handed to the subject upload's file input, so they pass the same server checks.
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
}
