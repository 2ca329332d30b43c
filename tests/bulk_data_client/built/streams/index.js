"use strict";
var __importDefault = (this && this.__importDefault) || function (mod) {
    return (mod && mod.__esModule) ? mod : { "default": mod };
};
Object.defineProperty(exports, "__esModule", { value: true });
exports.DocumentReferenceHandler = exports.StringifyNDJSON = exports.ParseNDJSON = void 0;
var ParseNDJSON_1 = require("./ParseNDJSON");
Object.defineProperty(exports, "ParseNDJSON", { enumerable: true, get: function () { return __importDefault(ParseNDJSON_1).default; } });
var StringifyNDJSON_1 = require("./StringifyNDJSON");
Object.defineProperty(exports, "StringifyNDJSON", { enumerable: true, get: function () { return __importDefault(StringifyNDJSON_1).default; } });
var DocumentReferenceHandler_1 = require("./DocumentReferenceHandler");
Object.defineProperty(exports, "DocumentReferenceHandler", { enumerable: true, get: function () { return __importDefault(DocumentReferenceHandler_1).default; } });
