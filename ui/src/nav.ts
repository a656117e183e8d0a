/** Goes to a page of the app without reloading. */
export function navigate(url: string, replace = false): void {
  if (replace) history.replaceState(null, '', url); else history.pushState(null, '', url);
  window.dispatchEvent(new PopStateEvent('popstate'));
}
