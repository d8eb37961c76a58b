// The browser bundle of tests/test_webpubsub_browser.py: Microsoft's
// @azure/web-pubsub-client as a page loads it after an application's
// bundler (esbuild here) has packed it: window.AzureWPS.WebPubSubClient.
export { WebPubSubClient } from "@azure/web-pubsub-client";
