// Merge Lab: browser-side helpers of the "Merge" tab, loaded by the WebUI from this folder.
// Copies the recipe JSON of the current merge to the clipboard.
function mergeLabCopyRecipe(text) {
    if (navigator.clipboard) { navigator.clipboard.writeText(text); }
    return text;
}
