// Runs Replicate's JavaScript client and the Vercel AI SDK's Replicate provider against the server named on
// the command line (base URL, API key); prints what each got back as one JSON line.
import Replicate from "replicate";
import { createReplicate } from "@ai-sdk/replicate";
import { generateImage } from "ai";

const [base, key] = process.argv.slice(2);
const client = new Replicate({ auth: key, baseUrl: `${base}/v1`, useFileOutput: false });
const output = await client.run("black-forest-labs/flux-dev", {
  input: { prompt: "from javascript", num_outputs: 2, num_inference_steps: 1, megapixels: "0.25" },
});
const provider = createReplicate({ apiToken: key, baseURL: `${base}/v1` });
const { images } = await generateImage({
  model: provider.image("black-forest-labs/flux-1.1-pro"),
  prompt: "from the AI SDK",
  aspectRatio: "16:9",
});
console.log(JSON.stringify({ output, images: images.map((image) => image.base64) }));
